from moescale.bench import main

main()
