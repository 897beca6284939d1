"""Exports dataset splits to .npz files for machines without TFDS.

  python scripts/export_arrays.py --out=/path/to/arrays      # fashion_mnist train + test
  PTQ_JAX_ARRAYS_DIR=/path/to/arrays python run.py ...       # elsewhere, no TFDS needed
"""

import argparse
import os

from ptq_jax.data.arrays import arrays_path, save_split
from ptq_jax.data.loader import load_split


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Export dataset splits to .npz files.')
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--splits', default='train,test')
  parser.add_argument('--out', required=True)
  parser.add_argument('--data_dir', default=None, help='TFDS data directory.')
  args = parser.parse_args(argv)
  for split in args.splits.split(','):
    data = load_split(args.dataset, split, data_dir=args.data_dir, arrays_dir='')
    path = arrays_path(args.out, args.dataset, split)
    save_split(path, data)
    print(f'{path}: {len(data)} examples, {os.path.getsize(path) / 2**20:.1f} MiB')


if __name__ == '__main__':
  main()
