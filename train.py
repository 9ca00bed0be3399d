"""Train a model: the lecture's epoch loop (filled in by the training issue)."""

import argparse

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
