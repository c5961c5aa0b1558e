from come_rl.bench.cli import main

main()
