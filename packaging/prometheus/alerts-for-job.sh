#!/bin/sh
# alerts.yml for a scrape job not called "edgeserve": every job selector is replaced.
#   packaging/prometheus/alerts-for-job.sh 'job="kubernetes-pods",namespace="ml"' > alerts.yml
# The argument is a PromQL label matcher list (what goes inside the braces).
set -eu
if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 'job=\"NAME\"[,label=\"value\"...]'" >&2
    exit 2
fi
case "$1" in
    *[\|\&\\]*)
        printf '%s: the matcher may not hold a |, & or backslash\n' "$0" >&2
        exit 2
        ;;
esac
sed "s|job=\"edgeserve\"|$1|g" "$(dirname "$0")/alerts.yml"
