#!/usr/bin/env bash
# Throw-away X.509 test PKI for the interop tests (openssl CLI only; used by node/lib.mjs and
# python/x509pki.py). Every key is generated at test time, in a temporary folder, and never kept.
#
#   pki.sh ca   DIR NAME CN ALG [ISSUER]            # CA: self-signed root, or signed by ISSUER
#   pki.sh leaf DIR NAME CN ALG ISSUER|- [expired]  # device certificate ('-' = self-signed)
#
# ALG is `rsa` (RSA 2048) or `ec` (ECDSA P-256). Output in DIR: NAME.key, NAME.pem and
# NAME.chain.pem (NAME.pem followed by its issuers up to, not including, the self-signed root:
# what a device sends). ISSUER names a CA made before in the same DIR.
# CA certificates: basicConstraints critical CA:TRUE, keyUsage critical keyCertSign, cRLSign.
# Device certificates: v3, basicConstraints critical CA:FALSE, keyUsage critical digitalSignature
# (plus keyEncipherment for RSA), extendedKeyUsage clientAuth, valid from now for 2 days, or,
# with `expired`, from 2020-01-01 to 2020-02-01 (through `openssl ca -startdate/-enddate`, as
# `openssl x509 -not_before` needs openssl >= 3.4).
set -euo pipefail

cmd=${1:?usage: pki.sh ca|leaf DIR NAME CN ALG [...]}
dir=${2:?DIR}
name=${3:?NAME}
cn=${4:?CN}
alg=${5:?ALG}
issuer=${6:-}
expired=${7:-}
mkdir -p "$dir"
cd "$dir"

case "$alg" in
  rsa) openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$name.key" 2>/dev/null \
         || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$name.key" 2>/dev/null ;;
  ec)  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key" 2>/dev/null ;;
  *)   echo "pki.sh: ALG must be rsa or ec" >&2; exit 2 ;;
esac

ku=digitalSignature
[[ $alg == rsa ]] && ku=digitalSignature,keyEncipherment
case "$cmd" in
  ca)
    cat >"$name.ext" <<EOF
[v3]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    ;;
  leaf)
    [[ -n $issuer ]] || { echo "pki.sh leaf: ISSUER or - required" >&2; exit 2; }
    cat >"$name.ext" <<EOF
[v3]
basicConstraints = critical, CA:FALSE
keyUsage = critical, $ku
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    ;;
  *) echo "pki.sh: unknown command $cmd" >&2; exit 2 ;;
esac

openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr" 2>/dev/null
serial=0x$(openssl rand -hex 12)

if [[ $expired == expired ]]; then
  [[ -n $issuer && $issuer != - ]] || { echo "pki.sh: an expired certificate needs an ISSUER" >&2; exit 2; }
  db=$name.cadb
  mkdir -p "$db"
  : >"$db/index.txt"
  echo "${serial#0x}" >"$db/serial"
  cat >"$db/ca.cnf" <<EOF
[ca]
default_ca = tmp
[tmp]
database = $db/index.txt
new_certs_dir = $db
serial = $db/serial
default_md = sha256
policy = any
unique_subject = no
email_in_dn = no
[any]
commonName = supplied
EOF
  openssl ca -batch -notext -config "$db/ca.cnf" -in "$name.csr" -out "$name.pem" \
    -cert "$issuer.pem" -keyfile "$issuer.key" -startdate 20200101000000Z -enddate 20200201000000Z \
    -extfile "$name.ext" -extensions v3 2>/dev/null
  rm -rf "$db"
elif [[ -z $issuer || $issuer == - ]]; then
  # self-signed (root CA, or an unenrolled device certificate)
  sed -i 's/^authorityKeyIdentifier.*$//' "$name.ext"
  openssl x509 -req -in "$name.csr" -signkey "$name.key" -days 3650 -set_serial "$serial" -sha256 \
    -extfile "$name.ext" -extensions v3 -out "$name.pem" 2>/dev/null
else
  openssl x509 -req -in "$name.csr" -CA "$issuer.pem" -CAkey "$issuer.key" -days 2 -set_serial "$serial" \
    -sha256 -extfile "$name.ext" -extensions v3 -out "$name.pem" 2>/dev/null
fi
rm -f "$name.csr" "$name.ext"

# The chain a device (or an intermediate) presents: itself, then its issuers without the root.
cp "$name.pem" "$name.chain.pem"
if [[ -n $issuer && $issuer != - && -s $issuer.chain.pem ]]; then
  cat "$issuer.chain.pem" >>"$name.chain.pem"
fi
if [[ $cmd == ca && ( -z $issuer || $issuer == - ) ]]; then
  : >"$name.chain.pem"  # a root is never sent
fi
