from lorafit.cli.app import main

main()
