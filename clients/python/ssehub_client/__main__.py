from ssehub_client.cli import main

main()
