#!/bin/sh
# SPDX-License-Identifier: MIT
# needs-module.sh PYTHON MODULE COMMAND...: skip (77) unless PYTHON can
# import MODULE, else run COMMAND.
py=$1 mod=$2
shift 2
if ! "$py" -c "import $mod" >/dev/null 2>&1; then
    echo "SKIP: $py cannot import $mod (install python3-$mod)"
    exit 77
fi
exec "$@"
