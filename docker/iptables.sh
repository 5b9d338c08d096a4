#!/usr/bin/env bash
# chatwall transparent mode: the iptables / ip6tables recipe.
#
# Redirects TCP 80, TCP 443 and the IM ports to chatwall's transparent
# listeners, never redirects chatwall's own upstream connections (socket mark
# `[upstream] mark`, and/or the user chatwall runs as), and drops UDP 80/443
# so that browsers fall back from QUIC (HTTP/3) to TCP, where chatwall sees
# the Host header and the TLS SNI.
#
#   PREROUTING (nat)  clients routed through this host (gateway deployment)
#   OUTPUT     (nat)  clients on this host itself (--local)
#   FORWARD / OUTPUT (filter)  UDP 80 and 443 (QUIC) dropped
#
# Everything lives in chains of its own (CHATWALL_PRE, CHATWALL_OUT,
# CHATWALL_QUIC, ...), reached by one jump inserted first in each built-in
# chain, so `apply` is idempotent and `remove` takes exactly what `apply` added.
#
# usage: iptables.sh [options] apply|remove|print
#
#   --http-port PORT    chatwall's [listen] transparent_http port   (3129)
#   --tls-port PORT     chatwall's [listen] transparent_tls port    (3130)
#   --other-port PORT   chatwall's [listen] transparent port, for the IM ports (3131)
#   --im-ports LIST     TCP ports sent to --other-port: comma-separated,
#                       ranges as A-B or A:B; "" for none
#                       (default: the ports of the bundled signature set)
#   --mark VALUE[/MASK] exempt packets with this mark: chatwall's [upstream] mark
#   --owner USER|UID    exempt sockets of this user (OUTPUT only: the user chatwall runs as)
#   --exempt-src CIDR   never redirect from this source (repeatable; e.g. a
#                       chatwall container's address, whose mark does not
#                       survive the hop out of its network namespace)
#   --exempt-dst CIDR   never redirect to this destination (repeatable)
#   --in-iface IFACE    PREROUTING only for packets coming in on IFACE (repeatable;
#                       default: every interface)
#   --local             also redirect this host's own traffic (OUTPUT); needs
#                       --mark or --owner, or chatwall would redirect itself
#   --no-forward        no PREROUTING rules (local clients only)
#   --quic drop|reject|off   what to do with UDP 80/443 (drop)
#   -4 | -6             only IPv4 (iptables) or only IPv6 (ip6tables); default both
#   --prefix NAME       chain name prefix (CHATWALL)
#
# Examples
#   gateway, chatwall running as user "chatwall" with [upstream] mark = 42:
#     iptables.sh --mark 42 --owner chatwall --local apply
#   show the commands without running them:
#     iptables.sh --mark 42 print
#   take everything out again:
#     iptables.sh remove
#
# chatwall must listen on the redirect ports on 0.0.0.0 (and [::] for IPv6):
#   [listen]
#   transparent_http = ["0.0.0.0:3129", "[::]:3129"]
#   transparent_tls  = ["0.0.0.0:3130", "[::]:3130"]
#   transparent      = ["0.0.0.0:3131", "[::]:3131"]
# Routed clients also need forwarding on: sysctl -w net.ipv4.ip_forward=1
# net.ipv6.conf.all.forwarding=1.
set -euo pipefail

# The TCP ports of the bundled signature set's [[ports]] rules. 5223 is
# deliberately absent: it is Apple Push too.
DEFAULT_IM_PORTS="194,994,1863,4244,5050,5190,5222,5242,5243,5269,5280,5281,6665-6669,6697,7985,8074,8448,8801,8802"

http_port=3129
tls_port=3130
other_port=3131
im_ports=$DEFAULT_IM_PORTS
mark=""
owner=""
exempt_src=()
exempt_dst=()
in_ifaces=()
local_out=0
forward=1
quic=drop
families=(4 6)
prefix=CHATWALL
action=""

die() {
    echo "iptables.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

is_port() {
    [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

while (($#)); do
    case $1 in
    --http-port) http_port=${2:?--http-port needs a value}; shift ;;
    --tls-port) tls_port=${2:?--tls-port needs a value}; shift ;;
    --other-port) other_port=${2:?--other-port needs a value}; shift ;;
    --im-ports) (($# >= 2)) || die "--im-ports needs a value"; im_ports=$2; shift ;;
    --mark) mark=${2:?--mark needs a value}; shift ;;
    --owner) owner=${2:?--owner needs a value}; shift ;;
    --exempt-src) exempt_src+=("${2:?--exempt-src needs a value}"); shift ;;
    --exempt-dst) exempt_dst+=("${2:?--exempt-dst needs a value}"); shift ;;
    --in-iface) in_ifaces+=("${2:?--in-iface needs a value}"); shift ;;
    --local) local_out=1 ;;
    --no-forward) forward=0 ;;
    --quic) quic=${2:?--quic needs a value}; shift ;;
    -4) families=(4) ;;
    -6) families=(6) ;;
    --prefix) prefix=${2:?--prefix needs a value}; shift ;;
    -h | --help) usage; exit 0 ;;
    apply | remove | print) [[ -z $action ]] || die "one action only"; action=$1 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

[[ -n $action ]] || die "say apply, remove or print (see --help)"
for p in "$http_port" "$tls_port" "$other_port"; do
    is_port "$p" || die "not a port: $p"
done
case $quic in drop | reject | off) ;; *) die "--quic is one of drop, reject, off" ;; esac
if [[ -n $mark && ! $mark =~ ^(0x[0-9a-fA-F]+|[0-9]+)(/(0x[0-9a-fA-F]+|[0-9]+))?$ ]]; then
    die "not a mark: $mark"
fi
if ((local_out)) && [[ -z $mark && -z $owner ]]; then
    die "--local needs --mark or --owner: chatwall's own upstream connections would be redirected back to it"
fi

# IM ports as multiport lists of at most 15 slots (a range takes two).
im_groups=()
if [[ -n $im_ports ]]; then
    group=""
    slots=0
    IFS=',' read -r -a items <<<"$im_ports"
    for item in "${items[@]}"; do
        item=${item// /}
        [[ -n $item ]] || continue
        item=${item/-/:}
        if [[ $item == *:* ]]; then
            lo=${item%%:*} hi=${item##*:}
            is_port "$lo" && is_port "$hi" && ((10#$lo <= 10#$hi)) || die "not a port range: $item"
            weight=2
        else
            is_port "$item" || die "not a port: $item"
            weight=1
        fi
        if ((slots + weight > 15)); then
            im_groups+=("$group")
            group="" slots=0
        fi
        group=${group:+$group,}$item
        slots=$((slots + weight))
    done
    [[ -z $group ]] || im_groups+=("$group")
fi

PRE=${prefix}_PRE
OUT=${prefix}_OUT
QUIC=${prefix}_QUIC

# run FAMILY ARGS...: one ip(6)tables command, or its text under `print`.
run() {
    local fam=$1
    shift
    local cmd=iptables
    [[ $fam == 6 ]] && cmd=ip6tables
    if [[ $action == print ]]; then
        echo "$cmd $*"
    else
        "$cmd" -w "$@"
    fi
}

# quiet FAMILY ARGS...: a command whose failure is expected (removing what may
# not be there).
quiet() {
    local fam=$1
    shift
    local cmd=iptables
    [[ $fam == 6 ]] && cmd=ip6tables
    "$cmd" -w "$@" >/dev/null 2>&1
}

remove_family() {
    local fam=$1 cmd=iptables table chain words
    [[ $fam == 6 ]] && cmd=ip6tables
    for table in nat filter; do
        # Every jump into our chains, whatever options applied it.
        { "$cmd" -w -t "$table" -S 2>/dev/null || true; } |
            { grep -E -- "^-A (PREROUTING|OUTPUT|FORWARD) .*-j ${prefix}_(PRE|OUT|QUIC)\$" || true; } |
            while read -r -a words; do
                words[0]=-D
                "$cmd" -w -t "$table" "${words[@]}" || true
            done
    done
    for chain in "$PRE" "$OUT"; do
        quiet "$fam" -t nat -F "$chain" || true
        quiet "$fam" -t nat -X "$chain" || true
    done
    quiet "$fam" -t filter -F "$QUIC" || true
    quiet "$fam" -t filter -X "$QUIC" || true
}

# The redirect rules shared by PREROUTING and OUTPUT.
redirects() {
    local fam=$1 chain=$2 g
    run "$fam" -t nat -A "$chain" -p tcp --dport 80 -j REDIRECT --to-ports "$http_port"
    run "$fam" -t nat -A "$chain" -p tcp --dport 443 -j REDIRECT --to-ports "$tls_port"
    for g in "${im_groups[@]}"; do
        run "$fam" -t nat -A "$chain" -p tcp -m multiport --dports "$g" -j REDIRECT --to-ports "$other_port"
    done
}

# same_family 4|6 CIDR: is the address of that family?
same_family() {
    if [[ $2 == *:* ]]; then [[ $1 == 6 ]]; else [[ $1 == 4 ]]; fi
}

# The exemptions shared by PREROUTING and OUTPUT.
exemptions() {
    local fam=$1 chain=$2 net
    # Connections to this host itself (its own services, and a client
    # connecting straight to chatwall's ports) are not redirected.
    run "$fam" -t nat -A "$chain" -m addrtype --dst-type LOCAL -j RETURN
    [[ -z $mark ]] || run "$fam" -t nat -A "$chain" -m mark --mark "$mark" -j RETURN
    for net in "${exempt_src[@]}"; do
        if same_family "$fam" "$net"; then run "$fam" -t nat -A "$chain" -s "$net" -j RETURN; fi
    done
    for net in "${exempt_dst[@]}"; do
        if same_family "$fam" "$net"; then run "$fam" -t nat -A "$chain" -d "$net" -j RETURN; fi
    done
}

apply_family() {
    local fam=$1 i
    run "$fam" -t nat -N "$PRE"
    exemptions "$fam" "$PRE"
    redirects "$fam" "$PRE"
    if ((local_out)); then
        run "$fam" -t nat -N "$OUT"
        [[ -z $owner ]] || run "$fam" -t nat -A "$OUT" -m owner --uid-owner "$owner" -j RETURN
        exemptions "$fam" "$OUT"
        redirects "$fam" "$OUT"
        run "$fam" -t nat -I OUTPUT 1 -p tcp -j "$OUT"
    fi
    if ((forward)); then
        local ifs=("${in_ifaces[@]}")
        ((${#ifs[@]})) || ifs=("")
        for i in "${ifs[@]}"; do
            # shellcheck disable=SC2086 # empty when no interface is given
            run "$fam" -t nat -I PREROUTING 1 ${i:+-i "$i"} -p tcp -j "$PRE"
        done
    fi
    if [[ $quic != off ]]; then
        local target=(-j DROP)
        if [[ $quic == reject ]]; then
            if [[ $fam == 6 ]]; then
                target=(-j REJECT --reject-with icmp6-port-unreachable)
            else
                target=(-j REJECT --reject-with icmp-port-unreachable)
            fi
        fi
        run "$fam" -t filter -N "$QUIC"
        run "$fam" -t filter -A "$QUIC" -p udp -m multiport --dports 80,443 "${target[@]}"
        if ((forward)); then
            for i in "${ifs[@]}"; do
                # shellcheck disable=SC2086
                run "$fam" -t filter -I FORWARD 1 ${i:+-i "$i"} -p udp -j "$QUIC"
            done
        fi
        if ((local_out)); then
            run "$fam" -t filter -I OUTPUT 1 -p udp -j "$QUIC"
        fi
    fi
}

for fam in "${families[@]}"; do
    if [[ $action != print ]]; then
        cmd=iptables
        [[ $fam == 6 ]] && cmd=ip6tables
        command -v "$cmd" >/dev/null || die "$cmd is not installed"
    fi
    case $action in
    print) apply_family "$fam" ;;
    remove) remove_family "$fam" ;;
    apply)
        remove_family "$fam"
        apply_family "$fam"
        ;;
    esac
done
