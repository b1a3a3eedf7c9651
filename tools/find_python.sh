#!/bin/bash
# Prints the path of a CPython X.Y interpreter: python3.X on PATH if it runs, else pyenv's
# newest X.Y.*. Usage: tools/find_python.sh 3.12
if command -v "python$1" > /dev/null && "python$1" -c "" 2> /dev/null; then
  command -v "python$1"
else
  pyenv_root=$(pyenv root 2> /dev/null || echo ~/.pyenv)
  found=$(ls -d "$pyenv_root/versions/$1".*/bin/python 2> /dev/null | sort -V | tail -1)
  [ -n "$found" ] || { echo "no Python $1 (python$1 on PATH, or pyenv's)" >&2; exit 1; }
  echo "$found"
fi
