#!/bin/sh
# SPDX-License-Identifier: MIT
# make-script.sh IN OUT LIBDIR BINDIR: a launcher script from its .in file,
# with the install directories filled in and the run bit set, so that it
# runs from the build folder as it will after install.
set -eu
sed -e "s|@LIBDIR@|$3|g" -e "s|@BINDIR@|$4|g" "$1" >"$2.tmp"
chmod 755 "$2.tmp"
mv "$2.tmp" "$2"
