// Package probe counts the Nginx frontend's TCP connections, packets and
// bytes per client-facing port with eBPF, and falls back to /proc where the
// kernel or the process's privileges do not allow eBPF.
package probe
