from loraforge.cli import main

main()
