from safeshard.cli import main

main()
