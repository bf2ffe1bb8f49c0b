from bytelm.cli import main

main()
