"""Figure 1 of the paper: a small convolutional net with ReLUs and with tanh.

The paper's Figure 1 trains "a four-layer convolutional neural network" on
CIFAR-10 with ReLUs and with tanh units, each at the learning rate that
makes it train fastest, without regularisation, and finds that ReLUs reach
25% training error six times sooner (docs/REFERENCE.md, "Ablations").
CIFAR-10 needs a network to download, so this config uses the best real data
available offline: Fashion-MNIST's training images from the Debian package
(`apt-get install dataset-fashion-mnist`).

    python -m alexnet.figure1 --config=configs/figure1.py \
        --workdir=runs/figure1

Trains both nets, writes `figure1.png`, `figure1.json` and TensorBoard
scalars into the workdir and prints the epochs each needs to reach every
target error and their ratio. Took 9 minutes (5 CPU-minutes) on a shared
2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the Figure 1 experiment."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # Directory of the Fashion-MNIST IDX .gz files (only the training pair is
  # read: the figure is about training error).
  config.idx_dir = '/usr/share/datasets/fashion-mnist'
  # Train on the first N training images (0: all 60,000). 10,000 (about 1,000
  # per class) keeps an epoch to 78 steps, so that the whole figure fits a few
  # CPU minutes with several epochs per curve.
  config.num_train = 10_000

  # --- Model ----------------------------------------------------------------
  # Four layers with weights, as cuda-convnet's small CIFAR-10 nets: three
  # 5x5 convolutions with these many kernels, each followed by the
  # activation and a 3x3, stride-2 max-pool, then a 10-way linear layer.
  config.features = (32, 32, 64)

  # --- Optimisation ---------------------------------------------------------
  # The project's momentum SGD (steps.make_optimizer) without regularisation:
  # no weight decay, no dropout, no augmentation.
  config.batch_size = 128
  config.momentum = 0.9
  config.weight_decay = 0.0
  # Learning rates tried for each activation. Each candidate trains for
  # `sweep_epochs`; the one with the lowest mean training error over that
  # stretch (the fastest to learn) is kept and trained on to `num_epochs`.
  # Runs whose loss goes non-finite are never kept.
  config.learning_rates = (0.01, 0.03, 0.1)
  config.sweep_epochs = 1
  config.num_epochs = 6
  # Training error is the running error of the minibatches, averaged over
  # each 1/records_per_epoch of an epoch (as cuda-convnet reported it).
  config.records_per_epoch = 10
  # Errors whose crossing epochs are reported; the first is the paper's.
  config.target_errors = (0.25, 0.10)
  # Seed for the initial weights (the same for every run) and data order.
  config.seed = 0
  return config
