#!/bin/sh
# SPDX-License-Identifier: MIT
# sort on a large file (about 60 MB), generated deterministically.
awk 'BEGIN { s = 1; for (i = 0; i < 3000000; i++) { s = (s * 1103515245 + 12345) % 2147483648; printf "%010d %s\n", s, i } }' >big.txt
sort -S 200M big.txt | md5sum
sort -n -k2 -r big.txt | head -3
