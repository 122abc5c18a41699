// Package packaging builds and checks pushrelay's Debian package. The Go
// code here is tests only: the cheap checks run with `make test` (unit file,
// security score, nginx -t on the snippets, the example config, the man
// page, the version mapping); `make deb-check` adds lintian and an install,
// upgrade, remove and purge in a throwaway debootstrap root.
package packaging
