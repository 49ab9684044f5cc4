"""AlexNet configurations: the paper's ImageNet recipe and named variants.

Select a variant with the config string, e.g. `--config=configs/alexnet.py:digits`.

* `configs/alexnet.py` (no argument): the paper's ImageNet recipe
  (Krizhevsky et al. 2012, section 5). Needs the ILSVRC2012 tars in
  `<data_dir>/downloads/manual`:

      python main.py --config=configs/alexnet.py --workdir=runs/imagenet

  Expected: ~40-42% top-1 / ~18-20% top-5 validation error (10-crop) after
  ~90 epochs (the paper reports 40.7 / 18.2 on ILSVRC-2012 val for one net).

* `configs/alexnet.py:digits`: the offline default. The real handwritten
  digits scikit-learn ships (1,797 8x8 images, 10 classes), upsampled to a
  67-pixel input: the smallest input that survives the paper's five convs
  and three pools. Same layers, towers, LRN and optimizer as the paper;
  Caffe's initialisation, because with the paper's init (biases 1, fc std
  0.01) this small problem stays at chance, see docs/faithfulness.md. The
  measured result and time are in docs/results.md.

      python main.py --config=configs/alexnet.py:digits --workdir=runs/digits

* `configs/alexnet.py:fashion_mnist`: Fashion-MNIST (60,000 + 10,000 28x28
  greyscale clothes, 10 classes) read offline from the original IDX files,
  which `apt-get install dataset-fashion-mnist` puts in
  /usr/share/datasets/fashion-mnist (or set --config.fashion_mnist_dir).
  The digits' input size and initialisation; trains on the first 90% of
  the training images, chooses on the last 10% and reports the test set;
  12 epochs with two learning-rate drops, centre-crop evaluation, about an
  hour on a 2-core CPU (docs/results.md).

      python main.py --config=configs/alexnet.py:fashion_mnist \
          --workdir=runs/fashion_mnist

* `configs/alexnet.py:caffe`: BVLC Caffe's bvlc_alexnet, the same two-tower
  net with Caffe's LRN (k=1, alpha/5, across both towers), BGR input and
  Caffe's mean image (imagenet_mean.binaryproto, from Caffe's
  data/ilsvrc12/get_ilsvrc_aux.sh, in the current directory or at
  --config.mean_file). Import the published weights, then score them
  (published: 57.1% top-1, 80.2% top-5 on ILSVRC-2012 val, centre crop):

      python main.py --config=configs/alexnet.py:caffe --mode=import \
          --weights=bvlc_alexnet.caffemodel --workdir=runs/bvlc_alexnet
      python main.py --config=configs/alexnet.py:caffe --mode=eval \
          --workdir=runs/bvlc_alexnet

* `configs/alexnet.py:tiny`: a few-second variant for tests (narrow net,
  67-pixel input, a handful of steps).

Any field can be overridden: `--config.batch_size=256`. The config is
locked, so a mistyped field name is refused.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the paper's recipe, or the variant named by `arg`."""
  config = paper_config()
  variants = {'digits': _digits, 'fashion_mnist': _fashion_mnist,
              'tiny': _tiny, 'caffe': _caffe}
  if arg:
    if arg not in variants:
      raise ValueError(
          f'Unknown config variant {arg!r}; choose one of {sorted(variants)} '
          'or give none for the paper recipe.')
    variants[arg](config)
  return config


def paper_config() -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe (docs/REFERENCE.md gives the sources)."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # 'digits' (offline, no network), 'fashion_mnist' (see
  # fashion_mnist_dir), 'folder' (a tree of images, see `folder`),
  # or any TFDS image-classification name, optionally 'name:version'.
  config.dataset = 'imagenet2012'
  # TFDS data directory; '' means TFDS's default (~/tensorflow_datasets).
  # ImageNet's tars go in <data_dir>/downloads/manual.
  config.data_dir = ''
  # Root of an image folder, laid out root/<split>/<class>/<image>
  # (dataset='folder').
  config.folder = ''
  # Directory holding the four Fashion-MNIST IDX .gz files
  # (dataset='fashion_mnist'); `apt-get install dataset-fashion-mnist` puts
  # them in /usr/share/datasets/fashion-mnist. '' reads TFDS's catalogue
  # `fashion_mnist` instead (`tfds build fashion_mnist` needs a network).
  config.fashion_mnist_dir = ''
  # Split the model is trained on (TFDS split syntax, e.g. 'train[:99%]').
  config.train_split = 'train'
  # Split reported as the validation result.
  config.eval_split = 'validation'
  # Optional held-out slice of train for tuning decisions, e.g. 'train[99%:]'
  # together with train_split='train[:99%]'. '' disables it.
  config.minival_split = ''
  # Which evaluated split's top-1 error drives the plateau schedule:
  # 'eval' (as the paper did) or 'minival' (keeps the validation set clean).
  config.plateau_split = 'eval'
  # Read the pre-resized shards that `python main.py --mode=prepare` writes
  # (each image decoded and resized to resize_size once, as the paper did)
  # instead of decoding the original images every epoch.
  config.use_shards = False
  # Where prepare writes the shards; '' means <data_dir>/alexnet_shards.
  config.shards_dir = ''
  # Shorter side is resized to this, then centre-cropped square (paper: 256).
  config.resize_size = 256
  # Network input: random crops in training, centre/corner crops in eval.
  # 227 is the paper's "224" with cuda-convnet's conv arithmetic.
  config.image_size = 227
  # Mean subtracted from every input, on the 0-255 scale: 'pixel' (the
  # paper's per-pixel mean image of the training set) or 'channel'.
  config.mean = 'pixel'
  # A published mean image to subtract instead of the training set's: a
  # Caffe .binaryproto (BlobProto) or a .npy array, [3, Z, Z] or [Z, Z, 3]
  # with Z = resize_size, in channel_order. '' (the paper): computed from
  # the training split and cached.
  config.mean_file = ''
  # Channel order the net reads: 'rgb' (the paper) or 'bgr' (Caffe's
  # weights). The mean is subtracted in RGB and the channels reversed last.
  config.channel_order = 'rgb'
  # Std of the PCA lighting noise alpha (paper: 0.1); 0 disables it.
  config.pca_sigma = 0.1
  # Where the RGB eigenvectors/values come from: 'dataset' (computed once on
  # the training set and cached) or 'imagenet' (published values).
  config.pca_stats = 'dataset'
  # Random horizontal reflections in training (paper: yes).
  config.random_flip = True
  # Random image_size crops in training (paper: yes, section 4.1); False
  # trains on the centre crop only.
  config.random_crop = True
  # Evaluate the paper's 10 crops (corners + centre, and reflections) with
  # softmax averaging, besides the centre crop.
  config.ten_crop = True
  # Training examples held in shuffle windows, in total: each data-parallel
  # replica shuffles its own slice of the data in windows of an equal share
  # (at least 1,024 examples; docs/REFERENCE.md, Data order).
  config.shuffle_buffer = 16_384
  # Train and evaluate on these classes only, e.g. (5, 6, 7, 8, 9): the
  # labels become 0..len-1 in the order given (every split). () keeps all.
  config.classes = ()
  # Keep only the first N examples of each class of the split(s)
  # train_split reads, in the split's order (so every seed sees the same
  # N); e.g. 100 for a few-shot training set. 0 keeps all.
  config.train_examples_per_class = 0

  # --- Fine-tuning (docs/pretrained.md) -------------------------------------
  # Start a new run from a checkpoint: a workdir (its latest checkpoint),
  # its checkpoints/ folder, or one step of it (<workdir>/checkpoints/1200).
  # Only the parameters are taken; the step and optimizer start fresh.
  # Resuming the new run resumes from its own workdir. '' trains from
  # scratch.
  config.init_from = ''
  # Layers (e.g. ('fc8',)) initialised afresh instead of copied: those whose
  # shapes change with a new class count.
  config.reinit = ()
  # Learning-rate multiplier of the re-initialised layers (Caffe's
  # fine-tuning recipe: 10). 1 trains every layer alike.
  config.reinit_lr_multiplier = 1.0

  # --- Model ----------------------------------------------------------------
  # Channel multiplier for every layer (1.0 = the paper's 48/128/192/192/128
  # kernels and 2048 units per tower). Small values make tiny test nets.
  config.width = 1.0
  # Towers (paper section 3.2): 2, the paper's net, or 1, its "one GPU"
  # comparison net: half the kernels in conv1-conv4, conv5 and fc6-fc8 at
  # full size (the paper's footnote). One tower runs data-parallel only
  # (--config.model_parallel=False on several devices).
  config.towers = 2
  # Hidden units: 'relu' (paper) or 'tanh' (the comparison of Figure 1).
  config.activation = 'relu'
  # Max pooling (paper section 3.4): 3x3 windows with stride 2 overlap;
  # pool_size=2, pool_stride=2 is the non-overlapping ablation.
  config.pool_size = 3
  config.pool_stride = 2
  # Local response normalisation, paper section 3.3: the paper's formula,
  # no division of alpha by size (cuda-convnet2 effectively used alpha/5).
  config.lrn = ml_collections.ConfigDict()
  # False replaces both LRN layers by the identity (the ablation).
  config.lrn.enabled = True
  config.lrn.k = 2.0
  config.lrn.size = 5
  config.lrn.alpha = 1e-4
  config.lrn.beta = 0.75
  # True scales the sum of squares by alpha / size, as Caffe and PyTorch do
  # (paper: False, alpha itself).
  config.lrn.alpha_over_size = False
  # True lets the window run across both towers' channels, as Caffe's LRN
  # over all 96 (256) maps does (paper: False, inside each tower). On a
  # tower pair the neighbour's edge channels are exchanged.
  config.lrn.across_towers = False
  # Dropout after fc6 and fc7 (paper: 0.5).
  config.dropout_rate = 0.5
  # Initialisation: 'paper' (N(0, 0.01), biases 1 in conv2/4/5, fc6/7) or
  # 'caffe' (biases 0.1, fc6/fc7 std 0.005).
  config.init_scheme = 'paper'
  # Compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
  config.dtype = 'float32'
  # Convolutions: 'xla' (XLA's own: cuDNN on GPUs, the MXU on TPUs, Eigen
  # on CPUs), 'patches' (patch-matmul kernel gradients for an XLA:CPU whose
  # own are slow, see alexnet/cpu_ops.py) or 'auto' (xla).
  config.conv_impl = 'auto'
  # With two or more devices put the two towers on separate devices (the
  # paper's model parallelism); False keeps both towers on every device and
  # uses all devices for data parallelism.
  config.model_parallel = True
  # Use the first N devices of each process; 0 uses them all.
  config.num_devices = 0

  # --- Optimisation (paper section 5) ---------------------------------------
  # Global batch size, split across data-parallel replicas and processes.
  config.batch_size = 128
  # Global evaluation batch size (images; 10-crop evaluates 10 views each).
  config.eval_batch_size = 128
  # Initial learning rate, the same for all layers.
  config.learning_rate = 0.01
  # v <- momentum * v - weight_decay * lr * w - lr * grad;  w <- w + v.
  config.momentum = 0.9
  # Applied to kernels only, as cuda-convnet2 and Caffe do
  # (docs/REFERENCE.md, Optimization).
  config.weight_decay = 5e-4
  # Divide the learning rate by 10 when validation error stops improving.
  config.plateau = ml_collections.ConfigDict()
  # Multiplier applied to the learning rate at each drop.
  config.plateau.factor = 0.1
  # Evaluations without improvement before a drop.
  config.plateau.patience = 4
  # Improvement smaller than this (absolute top-1 error) does not count.
  config.plateau.min_delta = 1e-3
  # Evaluations to wait after a drop before counting again.
  config.plateau.cooldown = 0
  # Stop dropping after this many drops (the paper dropped 3 times).
  config.plateau.max_drops = 3
  # Fixed drops instead of the plateau rule: the epochs from which the rate
  # is multiplied by plateau.factor once more, e.g. (20, 22). Empty (the
  # paper): the plateau rule. Compared runs then share one schedule.
  config.lr_drop_epochs = ()
  # Length of training (paper: roughly 90 epochs). num_train_steps > 0
  # overrides it.
  config.num_epochs = 90.0
  config.num_train_steps = -1

  # --- Bookkeeping ----------------------------------------------------------
  # Evaluate (and feed the plateau schedule) this often, in epochs.
  config.eval_every_epochs = 1.0
  # Also save a checkpoint every this many steps (and at each evaluation,
  # at the end, and on SIGTERM/SIGINT).
  config.checkpoint_every_steps = 1_000
  # Latest checkpoints kept (the best one by validation error is kept too).
  config.keep_checkpoints = 2
  # Train metrics and the progress line every this many steps.
  config.log_every_steps = 100
  # Warn when the loss stays at ln(num_classes) for this many evaluations
  # (the "flat loss" of the paper's init with wrongly scaled inputs).
  config.flat_loss_evals = 2
  # Seed for initialisation, data order, augmentation and dropout.
  config.seed = 0

  # --- Several processes (jax.distributed; see alexnet/distributed.py) ------
  # Left at their defaults, SLURM (srun), Open MPI (mpirun) and Cloud TPU
  # pods are detected, and a plain machine runs one process.
  # host:port of process 0's coordinator, the same on every process; ''
  # reads JAX_COORDINATOR_ADDRESS or detects it.
  config.coordinator_address = ''
  # Number of processes; 0 reads JAX_NUM_PROCESSES or detects it.
  config.num_processes = 0
  # This process's index in [0, num_processes); -1 reads JAX_PROCESS_ID or
  # detects it.
  config.process_id = -1
  return config


def _small_images(config: ml_collections.ConfigDict) -> None:
  """Shared by the offline variants: tiny pictures at the smallest input."""
  config.train_split = 'train'
  config.eval_split = 'test'
  # Upsampled to the smallest input the five convs and three pools accept;
  # 76/67 keeps the paper's 256/227 ratio of resize to crop.
  config.resize_size = 76
  config.image_size = 67
  # The paper's init stays at chance on such inputs (docs/faithfulness.md).
  config.init_scheme = 'caffe'
  config.batch_size = 64
  config.eval_batch_size = 250
  config.learning_rate = 0.01
  config.checkpoint_every_steps = 500


def _digits(config: ml_collections.ConfigDict) -> None:
  """Offline default: sklearn's digits at the smallest valid input size."""
  _small_images(config)
  config.dataset = 'digits'
  # Test error passes 3% around epoch 30 and the plateau schedule can then
  # divide the learning rate (an evaluation every 2 epochs, patience 3).
  config.num_epochs = 40.0
  config.eval_every_epochs = 2.0
  config.plateau.patience = 3
  config.log_every_steps = 50
  config.shuffle_buffer = 2_000


def _fashion_mnist(config: ml_collections.ConfigDict) -> None:
  """Fashion-MNIST from Debian's IDX files at the smallest valid input.

  The recipe (docs/results.md, Fashion-MNIST) was chosen on the held-out
  last 10% of the training files, never on the test set: training reads the
  first 90%, and every evaluation reports both the held-out slice
  ('minival') and the 10,000 test images ('eval').
  """
  _small_images(config)
  config.dataset = 'fashion_mnist'
  config.fashion_mnist_dir = '/usr/share/datasets/fashion-mnist'
  config.train_split = 'train[:90%]'
  config.minival_split = 'train[90%:]'
  config.plateau_split = 'minival'
  # The paper's batch. The step's cost at 67 pixels is mostly the fully
  # connected weights' memory traffic, the same at any batch, so 128 trains
  # ~25% more images/s than 64 here; the rate doubles with it.
  config.batch_size = 128
  config.learning_rate = 0.02
  # 12 epochs of 421 steps, the rate divided by 10 at epochs 8 and 11:
  # about an hour on the 2-core development CPU (docs/results.md). 10-crop
  # evaluation of the 16,000 evaluated images would add minutes per
  # evaluation there: turn it on with --config.ten_crop=True where
  # evaluation is cheap.
  config.num_epochs = 12.0
  config.lr_drop_epochs = (8.0, 11.0)
  config.ten_crop = False
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.shuffle_buffer = 16_384


def _tiny(config: ml_collections.ConfigDict) -> None:
  """A few-second net for tests: the digits data, narrow layers, few steps."""
  _digits(config)
  config.width = 0.125
  # A slice of the test split keeps each evaluation to two batches.
  config.eval_split = 'test[:32]'
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 4
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.shuffle_buffer = 64


def _caffe(config: ml_collections.ConfigDict) -> None:
  """BVLC Caffe's bvlc_alexnet: its LRN, channel order and mean image."""
  # ImageNet, 227 crops of 256 squares, 1000 classes: the paper's.
  config.lrn.k = 1.0
  config.lrn.alpha_over_size = True
  config.lrn.across_towers = True
  config.channel_order = 'bgr'
  config.mean_file = 'imagenet_mean.binaryproto'
  # The published figures are for the centre crop.
  config.ten_crop = False
  # Caffe trained without the PCA lighting noise and with its own
  # initialisation (bvlc_alexnet's page in Caffe's model zoo).
  config.pca_sigma = 0.0
  config.pca_stats = 'imagenet'
  config.init_scheme = 'caffe'
