from rollserve.cli import main

main()
