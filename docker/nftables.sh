#!/usr/bin/env bash
# chatwall transparent mode: the nftables recipe (same options as iptables.sh).
#
# Writes one `inet` table (IPv4 and IPv6 together) that redirects TCP 80,
# TCP 443 and the IM ports to chatwall's transparent listeners, never
# redirects chatwall's own upstream connections (socket mark `[upstream]
# mark`, and/or the user chatwall runs as), and drops UDP 80/443 so that
# browsers fall back from QUIC (HTTP/3) to TCP, where chatwall sees the Host
# header and the TLS SNI.
#
#   chain prerouting  (nat)     clients routed through this host (gateway)
#   chain output      (nat)     clients on this host itself (--local)
#   chains quic_*     (filter)  UDP 80 and 443 dropped
#
# The table is replaced in one transaction (`nft -f`), so `apply` is atomic
# and idempotent; `remove` deletes the table; `print` shows the ruleset.
#
# usage: nftables.sh [options] apply|remove|print
#
#   --http-port PORT    chatwall's [listen] transparent_http port   (3129)
#   --tls-port PORT     chatwall's [listen] transparent_tls port    (3130)
#   --other-port PORT   chatwall's [listen] transparent port, for the IM ports (3131)
#   --im-ports LIST     TCP ports sent to --other-port: comma-separated,
#                       ranges as A-B or A:B; "" for none
#                       (default: the ports of the bundled signature set)
#   --mark VALUE[/MASK] exempt packets with this mark: chatwall's [upstream] mark
#   --owner USER|UID    exempt sockets of this user (output only: the user chatwall runs as)
#   --exempt-src CIDR   never redirect from this source (repeatable)
#   --exempt-dst CIDR   never redirect to this destination (repeatable)
#   --in-iface IFACE    prerouting only for packets coming in on IFACE (repeatable)
#   --local             also redirect this host's own traffic (output); needs
#                       --mark or --owner, or chatwall would redirect itself
#   --no-forward        no prerouting rules (local clients only)
#   --quic drop|reject|off   what to do with UDP 80/443 (drop)
#   -4 | -6             only IPv4 or only IPv6; default both
#   --table NAME        the inet table's name (chatwall)
#
# Examples
#   nftables.sh --mark 42 --owner chatwall --local apply
#   nftables.sh --mark 42 print > /etc/nftables.d/chatwall.nft
#   nftables.sh remove
set -euo pipefail

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
family=both
table=chatwall
action=""

die() {
    echo "nftables.sh: $*" >&2
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
    -4) family=ipv4 ;;
    -6) family=ipv6 ;;
    --table) table=${2:?--table needs a value}; shift ;;
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
[[ $table =~ ^[A-Za-z][A-Za-z0-9_]*$ ]] || die "not a table name: $table"
case $quic in drop | reject | off) ;; *) die "--quic is one of drop, reject, off" ;; esac
num='(0x[0-9a-fA-F]+|[0-9]+)'
if [[ -n $mark && ! $mark =~ ^$num(/$num)?$ ]]; then
    die "not a mark: $mark"
fi
if ((local_out)) && [[ -z $mark && -z $owner ]]; then
    die "--local needs --mark or --owner: chatwall's own upstream connections would be redirected back to it"
fi
for i in "${in_ifaces[@]}"; do
    [[ $i =~ ^[A-Za-z0-9_.@:+-]+$ ]] || die "not an interface name: $i"
done

# IM ports as an nft set: "5050, 5222, 6665-6669".
im_set=""
if [[ -n $im_ports ]]; then
    IFS=',' read -r -a items <<<"$im_ports"
    for item in "${items[@]}"; do
        item=${item// /}
        [[ -n $item ]] || continue
        item=${item/:/-}
        if [[ $item == *-* ]]; then
            lo=${item%%-*} hi=${item##*-}
            is_port "$lo" && is_port "$hi" && ((10#$lo <= 10#$hi)) || die "not a port range: $item"
        else
            is_port "$item" || die "not a port: $item"
        fi
        im_set=${im_set:+$im_set, }$item
    done
fi

# The owner as a uid: nft resolves names at load time, which fails for a
# user that only exists in another container.
uid=""
if [[ -n $owner ]]; then
    if [[ $owner =~ ^[0-9]+$ ]]; then
        uid=$owner
    else
        uid=$(id -u "$owner" 2>/dev/null) || die "no such user: $owner"
    fi
fi

mark_match=""
if [[ -n $mark ]]; then
    if [[ $mark == */* ]]; then
        mark_match="meta mark and ${mark#*/} == ${mark%/*}"
    else
        mark_match="meta mark $mark"
    fi
fi

# Lines shared by the prerouting and output chains.
exemptions() {
    local net
    case $family in
    ipv4) echo "        meta nfproto ipv6 return" ;;
    ipv6) echo "        meta nfproto ipv4 return" ;;
    esac
    # Connections to this host itself (its own services, and a client
    # connecting straight to chatwall's ports) are not redirected.
    echo "        fib daddr type local return"
    [[ -z $mark_match ]] || echo "        $mark_match return"
    for net in "${exempt_src[@]}"; do
        if [[ $net == *:* ]]; then echo "        ip6 saddr $net return"; else echo "        ip saddr $net return"; fi
    done
    for net in "${exempt_dst[@]}"; do
        if [[ $net == *:* ]]; then echo "        ip6 daddr $net return"; else echo "        ip daddr $net return"; fi
    done
}

redirects() {
    echo "        tcp dport 80 redirect to :$http_port"
    echo "        tcp dport 443 redirect to :$tls_port"
    [[ -z $im_set ]] || echo "        tcp dport @im_ports redirect to :$other_port"
}

iface_match=""
if ((${#in_ifaces[@]})); then
    list=""
    for i in "${in_ifaces[@]}"; do list=${list:+$list, }\"$i\"; done
    iface_match="iifname != { $list } return"
fi

quic_verdict=drop
[[ $quic == reject ]] && quic_verdict="reject with icmpx type port-unreachable"
quic_family=""
case $family in
ipv4) quic_family="meta nfproto ipv4 " ;;
ipv6) quic_family="meta nfproto ipv6 " ;;
esac

ruleset() {
    echo "table inet $table {"
    if [[ -n $im_set ]]; then
        echo "    set im_ports {"
        echo "        type inet_service"
        echo "        flags interval"
        echo "        elements = { $im_set }"
        echo "    }"
    fi
    if ((forward)); then
        echo "    chain prerouting {"
        echo "        type nat hook prerouting priority dstnat; policy accept;"
        echo "        meta l4proto != tcp return"
        [[ -z $iface_match ]] || echo "        $iface_match"
        exemptions
        redirects
        echo "    }"
    fi
    if ((local_out)); then
        echo "    chain output {"
        echo "        type nat hook output priority -100; policy accept;"
        echo "        meta l4proto != tcp return"
        [[ -z $uid ]] || echo "        meta skuid $uid return"
        exemptions
        redirects
        echo "    }"
    fi
    if [[ $quic != off ]]; then
        if ((forward)); then
            echo "    chain quic_forward {"
            echo "        type filter hook forward priority filter; policy accept;"
            [[ -z $iface_match ]] || echo "        $iface_match"
            echo "        ${quic_family}udp dport { 80, 443 } $quic_verdict"
            echo "    }"
        fi
        if ((local_out)); then
            echo "    chain quic_output {"
            echo "        type filter hook output priority filter; policy accept;"
            echo "        ${quic_family}udp dport { 80, 443 } $quic_verdict"
            echo "    }"
        fi
    fi
    echo "}"
}

case $action in
print) ruleset ;;
remove)
    command -v nft >/dev/null || die "nft is not installed"
    if nft list table inet "$table" >/dev/null 2>&1; then
        nft delete table inet "$table"
    fi
    ;;
apply)
    command -v nft >/dev/null || die "nft is not installed"
    # Create-then-delete makes the replacement one transaction whether or
    # not the table existed.
    {
        echo "table inet $table {}"
        echo "delete table inet $table"
        ruleset
    } | nft -f -
    ;;
esac
