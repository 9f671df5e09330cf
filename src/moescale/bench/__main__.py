from moescale.cpu import heap

heap.keep_heap()  # before JAX starts its CPU client, as the command line does

from moescale.bench import main  # noqa: E402

main()
