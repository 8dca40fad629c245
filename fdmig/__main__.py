from fdmig.cli import main

main()
