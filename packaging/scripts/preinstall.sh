#!/bin/sh
# Before the files are unpacked: the service user and groups must exist for
# the files' owners. Kept on removal (a uid must never be reused for another
# owner of the same files).
set -e
if ! getent group ferry >/dev/null; then
	groupadd --system ferry
fi
if ! getent passwd ferry >/dev/null; then
	useradd --system --gid ferry --home-dir /var/lib/ferry --no-create-home \
		--shell /usr/sbin/nologin --comment "ferry services" ferry
fi
# Members of ferry-mi may ask the managed-identity endpoint for tokens when
# agent.conf says imds { allowed_groups = ["ferry-mi"] } (as Arc's himds).
if ! getent group ferry-mi >/dev/null; then
	groupadd --system ferry-mi
fi
exit 0
