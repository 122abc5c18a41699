// Package version holds the build's version, set by the linker:
//
//	go build -ldflags "-X github.com/pushrelay/pushrelay/sidecar/version.Version=1.2.3"
package version

// Version is the release, from `git describe` at build time.
var Version = "dev"
