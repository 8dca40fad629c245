from fdmig.cli import main

main(prog_name="fdmig")
