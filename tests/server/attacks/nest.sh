#!/bin/sh
# nest.sh N CMD ARGS...: run CMD N processes deep (each level a child of the one before, none
# an exec), past any walk up a fixed number of parents.
n=$1
shift
if [ "$n" -gt 0 ]; then
    sh "$0" $((n - 1)) "$@"
    exit $?
fi
exec "$@"
