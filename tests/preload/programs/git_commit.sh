#!/bin/sh
# SPDX-License-Identifier: MIT
# git creating a repository and committing, with fixed dates so the
# commit hashes are the same in every run.
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.invalid GIT_COMMITTER_NAME=t
export GIT_COMMITTER_EMAIL=t@example.invalid GIT_AUTHOR_DATE='2026-01-01T00:00:00Z'
export GIT_COMMITTER_DATE='2026-01-01T00:00:00Z' GIT_CONFIG_NOSYSTEM=1 HOME=$PWD
git init -q -b main repo && cd repo || exit 1
for i in $(seq 1 200); do echo "line $i" >>"file$((i % 20)).txt"; done
git add -A && git commit -qm first
seq 1 5000 >numbers.txt && git add numbers.txt && git commit -qm second
git gc -q
git log --format='%H %s' && git count-objects -v | grep -v size
