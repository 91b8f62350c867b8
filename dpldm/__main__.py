from dpldm.cli import main

main()
