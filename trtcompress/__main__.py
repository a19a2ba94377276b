from trtcompress.cli import main

main()
