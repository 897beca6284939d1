"""Builds data/imagenet_nips17/ (run once; the result is committed): the 1,000 labelled
photographs of the NIPS 2017 adversarial-competition development set, resized.

Source: the folder ``dataset/`` of the public GitHub repository yuyang-long/SSA
(``images/*.png``, 299x299, and ``images.csv``). Each photo is scaled so its short side
is 256 pixels (Lanczos) and stored as JPEG quality 90; ``labels.csv`` keeps, per photo,
the ImageNet class index (``TrueLabel - 1``: 0..999 in the standard order), the
author, the original URL and the licence URL from ``images.csv``.

  python scripts/make_imagenet_nips17.py --source=PATH/TO/SSA/dataset
"""

from __future__ import annotations

import argparse
import csv
import os

from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                   'imagenet_nips17')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', required=True, help="the repository's dataset/ folder")
  parser.add_argument('--short_side', type=int, default=256)
  parser.add_argument('--quality', type=int, default=90)
  args = parser.parse_args()
  rows = list(csv.DictReader(open(os.path.join(args.source, 'images.csv'), encoding='utf-8')))
  os.makedirs(os.path.join(OUT, 'images'), exist_ok=True)
  with open(os.path.join(OUT, 'labels.csv'), 'w', newline='', encoding='utf-8') as f:
    out = csv.writer(f)
    out.writerow(['image_id', 'label', 'author', 'source_url', 'license_url'])
    for row in sorted(rows, key=lambda r: r['ImageId']):
      image = Image.open(os.path.join(args.source, 'images', row['ImageId'] + '.png'))
      image = image.convert('RGB')
      scale = args.short_side / min(image.size)
      size = (round(image.size[0] * scale), round(image.size[1] * scale))
      image.resize(size, Image.LANCZOS).save(
          os.path.join(OUT, 'images', row['ImageId'] + '.jpg'), quality=args.quality)
      out.writerow([row['ImageId'], int(row['TrueLabel']) - 1, row['Author'],
                    row['OriginalLandingURL'], row['License']])
  print(f'{len(rows)} photos written to {OUT}')


if __name__ == '__main__':
  main()
