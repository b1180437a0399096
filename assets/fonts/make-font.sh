#!/usr/bin/env bash
# Writes DejaVuSans-plot.ttf, the font phasekit draws its plots with (src/plot/), from Debian's
# fonts-dejavu-core (2.37): DejaVu Sans cut down to the characters plots use (Latin-1, Greek,
# punctuation, super- and subscripts, arrows, math operators) and without hinting, which the
# rasteriser (ab_glyph) does not read. About 50 KB instead of 757 KB.
#
#   apt-get install -y fonts-dejavu-core && pip install fonttools==4.68.0
#   assets/fonts/make-font.sh
#
# The licence (LICENSE beside this script) allows modified copies whose names contain neither
# "Bitstream" nor "Vera"; the font keeps its name, DejaVu Sans.
set -euo pipefail
cd "$(dirname "$0")"
pyftsubset /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
    --unicodes="U+0020-007E,U+00A0-00FF,U+0391-03A9,U+03B1-03C9,U+2010-2027,U+2070-209F,U+2190-2199,U+2200-22FF" \
    --no-hinting --desubroutinize --layout-features='kern' \
    --output-file=DejaVuSans-plot.ttf
