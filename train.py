"""Train a model on images: the lecture's epoch loop (Inception3, MSE, Adam on the built-in lens data by default).

Prints `Epoch N: Loss = ...` per epoch, checkpoints every epoch into --workdir and resumes from it.
"""

import sys

from jaxnets import config as config_lib
from jaxnets import host_memory


def train(config: config_lib.Config) -> int:
    from jaxnets import experiment

    result = experiment.train_and_evaluate(config)
    if result["interrupted"]:
        return result["interrupted"]
    print(f"Run saved in {config.run_dir}; evaluate it with: python evaluate.py --workdir {config.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    config = config_lib.from_args(config_lib.parser(__doc__).parse_args(argv))
    from jaxnets import experiment  # after argument parsing, so --help is instant

    return experiment.run_command(train, config)


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # before JAX allocates: faster train steps on CPU
    sys.exit(main())
