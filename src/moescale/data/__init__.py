"""Data: embedded corpus, vocabularies, seqio tasks, packed per-host batches.

Modules:
  readers   files to documents: text, JSON lines, WikiText articles, byte
            blocks (pure Python: no TensorFlow, no seqio)
  corpus    which files make each split: the embedded default corpus, user
            text / JSON-lines files, WikiText-103, enwik8 (pure Python)
  vocab     bytes / SentencePiece vocabularies, SentencePiece training,
            bytes per token (imports seqio only inside functions)
  tasks     seqio Tasks: default corpus, text / JSON-lines, WikiText-103,
            enwik8 (imports seqio and TensorFlow)
  pipeline  DataPipeline / get_dataset: packed, sharded, resumable numpy
            batches (imports seqio)
  sharded   ShardedIterator: training batches from each host's own documents,
            resumable in O(1) (imports seqio to read)
  stats     split and epoch sizes, for logs and bits per byte (imports seqio)
  source    SeqioDataSource: the trainer's data source (imports seqio)

Importing this package is light: the names below are loaded on first use
(PEP 562), so `import moescale.data.corpus` never imports TensorFlow.
"""

from moescale import lazy

_LAZY = {
    # corpus
    'sotu_speech_files': 'corpus', 'sotu_split_files': 'corpus',
    'kjv_chapters': 'corpus', 'pydoc_topics': 'corpus',
    # vocab
    'get_vocabulary': 'vocab', 'train_sentencepiece': 'vocab',
    'token_byte_lengths': 'vocab', 'bits_per_byte': 'vocab',
    # tasks
    'register_default_tasks': 'tasks', 'register_text_task': 'tasks',
    'register_wikitext103': 'tasks', 'register_enwik8': 'tasks',
    'get_provider': 'tasks', 'unregister': 'tasks',
    # pipeline, stats, source
    'DataPipeline': 'pipeline', 'get_dataset': 'pipeline',
    'split_stats': 'stats', 'count_tokens': 'stats',
    'SeqioDataSource': 'source', 'ShardedIterator': 'sharded',
}

__getattr__, __dir__, __all__ = lazy.names(__name__, _LAZY)
