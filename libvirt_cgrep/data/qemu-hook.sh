#!/bin/sh
# virt-cgrep qemu hook: tells the virt-cgrep agent that a protected domain
# started, stopped, was released, reconnected or migrated.
#
# libvirtd runs it as: virt-cgrep DOMAIN OP SUBOP EXTRA, the domain XML on stdin.
# For a domain whose XML carries the protection namespace, it drops one JSON
# line into the spool: NS-PID.json = {"domain": ..., "op": ..., "subop": ..., "time": ...}
#
# Rules: a failing hook fails or kills the guest, and a hung hook hangs the
# domain operation. So: always exit 0, never call back into libvirt, read at
# most 1 MiB of stdin and drain the rest, only sh builtins and coreutils.
#
# Installed by 'virt-cgrep hooks install', which rewrites the SPOOL line.
SPOOL=/var/lib/libvirt-cgrep/spool
NS=urn:x-libvirt-cgrep:protection:1

LC_ALL=C
export LC_ALL
umask 077

drain() { cat >/dev/null 2>&1; }

case $2 in
started | reconnect | stopped | release | migrate) ;;
*) drain; exit 0 ;;
esac

xml=$(head -c 1048576 2>/dev/null)
drain
case $xml in
*"$NS"*) ;;
*) exit 0 ;;
esac

# JSON string body of $1: escape backslash, quote and control characters.
json_escape() {
    rest=$1 out=
    case $rest in
    *[\\\"[:cntrl:]]*) ;;
    *) printf '%s' "$rest"; return ;;
    esac
    while [ -n "$rest" ]; do
        c=${rest%"${rest#?}"}
        rest=${rest#?}
        case $c in
        \\ | \") out=$out\\$c ;;
        [[:cntrl:]]) out=$out$(printf '\\u%04x' "'$c") ;;
        *) out=$out$c ;;
        esac
    done
    printf '%s' "$out"
}

ns=$(date +%s%N 2>/dev/null)
case $ns in
'' | *[!0-9]*) ns=$(date +%s 2>/dev/null)000000000 ;;
esac
sec=${ns%?????????}
event="{\"domain\": \"$(json_escape "$1")\", \"op\": \"$2\", \"subop\": \"$(json_escape "$3")\", \"time\": ${sec:-0}.${ns#"$sec"}}"

tmp=$SPOOL/.$ns-$$.tmp
set -C
if printf '%s\n' "$event" >"$tmp" 2>/dev/null && mv -f "$tmp" "$SPOOL/$ns-$$.json" 2>/dev/null; then
    exit 0
fi
rm -f "$tmp" 2>/dev/null
echo "virt-cgrep hook: cannot write an event for $2 into $SPOOL" >&2
exit 0
