"""``python cli.py fit --config configs/cola.yaml``: the command line of a checkout, the same as the installed
``adalora-pl`` command (:mod:`adalora_pl.cli`, where it lives and is documented)."""

from adalora_pl.cli import main

if __name__ == "__main__":
    main()
