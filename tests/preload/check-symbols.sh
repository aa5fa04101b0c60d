#!/bin/sh
# SPDX-License-Identifier: MIT
# check-symbols.sh LIB EXPECTED [EXCLUDE]: the dynamic symbols LIB defines
# must be exactly the list in EXPECTED (one name per line), less the names
# matching the regular expression EXCLUDE (features left out of the build).
nm -D --defined-only "$1" | awk '{print $3}' | sed 's/@.*//' | sort -u >"${TMPDIR:-/tmp}/ta-syms.$$"
sort -u "$2" | grep -Ev "${3:-^$}" | diff -u - "${TMPDIR:-/tmp}/ta-syms.$$"
rc=$?
rm -f "${TMPDIR:-/tmp}/ta-syms.$$"
[ $rc -eq 0 ] && echo "PASS: $(wc -l <"$2") exported symbols, exactly the intended list"
exit $rc
