"""``python -m mfdetr ...`` (used by ``torchrun -m mfdetr extract ...``)."""

from mfdetr.cli import main

if __name__ == "__main__":
    main()
