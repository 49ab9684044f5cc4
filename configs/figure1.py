"""Figure 1 of the paper: a small convolutional net with ReLUs and with tanh.

The paper's Figure 1 trains "a four-layer convolutional neural network" on
CIFAR-10 with ReLUs and with tanh units, each at the learning rate that
makes it train fastest, without regularisation, and finds that ReLUs reach
25% training error six times sooner (docs/REFERENCE.md, "Ablations").
CIFAR-10 needs a network to download, so this config uses the best real data
available offline: Fashion-MNIST's training images from the Debian package
(`apt-get install dataset-fashion-mnist`).

    python -m experiments.figure1 --config=configs/figure1.py \
        --workdir=runs/figure1

For each of three seeds trains both nets; writes `figure1.png`,
`figure1.json` and TensorBoard scalars into the workdir and prints a table
of the epochs each needs to reach 25%, 15% and 10% training error and their
ratio tanh / ReLU (mean ± std over the seeds). About 4 CPU-minutes per
seed; 71 minutes wall on the 2-core CPU shared with six other jobs
(docs/results.md, Figure 1).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the Figure 1 experiment."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # Directory of the Fashion-MNIST IDX .gz files (only the training pair is
  # read: the figure is about training error).
  config.idx_dir = '/usr/share/datasets/fashion-mnist'
  # Train on the first N training images (0: all 60,000). 5,000 (about 500
  # per class) keeps an epoch to 39 steps, so that three seeds of 8 epochs
  # per curve fit an hour of a shared 2-core CPU.
  config.num_train = 5_000

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
  config.num_epochs = 8
  # Training error is the running error of the minibatches, averaged over
  # each 1/records_per_epoch of an epoch (as cuda-convnet reported it).
  config.records_per_epoch = 10
  # Errors whose crossing epochs are reported; the first is the paper's.
  # Fashion-MNIST is easier than CIFAR-10: both nets pass 25% within the
  # first epoch, so the lower targets are where the two can separate.
  config.target_errors = (0.25, 0.15, 0.10)
  # One full experiment per seed (initial weights, shared by both
  # activations, and data order); ratios are reported as mean ± std.
  config.seeds = (0, 1, 2)
  return config
