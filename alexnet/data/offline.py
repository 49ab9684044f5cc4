"""TFDS builders written in this repository and prepared without a network.

The offline datasets (digits, Fashion-MNIST from its IDX files) are TFDS
builders so that they go through the same sources, shuffling and caching as
any catalogue dataset. A builder defined in a plain module (not a TFDS
dataset package) needs three things done by hand, collected here.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the offline image-classification builders.

  Registration is skipped so that importing a module twice (tests, reloads)
  cannot clash in TFDS's registry and a name cannot shadow a catalogue
  dataset; construct the classes directly.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # No checksums file to find. TFDS's own lookup also imports
    # `importlib_resources`, which tensorflow-datasets 4.9.10 uses without
    # declaring it for Python >= 3.9.
    return None

  def image_info(self, *, description: str, image_shape: tuple[int, ...],
                 labels: tfds.features.ClassLabel,
                 homepage: str) -> tfds.core.DatasetInfo:
    """The DatasetInfo of uint8 images and class labels.

    Built by hand: `dataset_info_from_configs` needs the builder to live in
    a TFDS dataset package.
    """
    return tfds.core.DatasetInfo(
        builder=self, description=description,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=image_shape, dtype=np.uint8),
            'label': labels}),
        supervised_keys=('image', 'label'), homepage=homepage)


def prepare(builder: Any) -> Any:
  """Prepares `builder` if it is not yet prepared; returns it."""
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
