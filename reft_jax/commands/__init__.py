"""One module per `reft` subcommand: add_arguments(parser) and run(args)."""
