"""Settings shared by every config: data location and the job's common fields."""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """Where the data comes from (see ptq_jax.data.loader)."""
  data = ml_collections.ConfigDict()
  data.dataset = 'fashion_mnist'
  # TFDS data dir for the prepared array_record files (None: TFDS's default).
  data.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Fashion-MNIST IDX dir (None: $PTQ_JAX_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist).
  data.idx_dir = ml_collections.FieldReference(None, field_type=str)
  # Allow TFDS to download the standard dataset when the local files are missing.
  data.download = False
  return data
