from moescale import host_memory

host_memory.keep_heap()  # before JAX starts its CPU client, as the command line does

from moescale.bench import main  # noqa: E402

main()
