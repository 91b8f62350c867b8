from dpldm.cli import console

console()
