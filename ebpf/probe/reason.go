package probe

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Linux capability numbers (linux/capability.h); x/sys/unix has them all but
// naming them here keeps the reason text and the check side by side.
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

var capNames = map[int]string{
	capNetAdmin: "CAP_NET_ADMIN",
	capSysAdmin: "CAP_SYS_ADMIN",
	capPerfmon:  "CAP_PERFMON",
	capBPF:      "CAP_BPF",
}

// effectiveCaps returns the calling thread's effective capability set.
func effectiveCaps() (uint64, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("capget: %w", err)
	}
	return uint64(data[0].Effective) | uint64(data[1].Effective)<<32, nil
}

// missingCaps names those of want that the process lacks. CAP_SYS_ADMIN
// stands in for CAP_BPF and CAP_PERFMON, as the kernel lets it.
func missingCaps(want ...int) []string {
	eff, err := effectiveCaps()
	if err != nil {
		return nil
	}
	has := func(c int) bool { return eff&(1<<c) != 0 }
	var out []string
	for _, c := range want {
		if has(c) || ((c == capBPF || c == capPerfmon) && has(capSysAdmin)) {
			continue
		}
		out = append(out, capNames[c])
	}
	return out
}

// explain turns a load or attach error into the one-line reason an operator
// needs: which capability is missing, or that the kernel is too old, followed
// by the error itself.
func explain(err error, needs ...int) string {
	// cilium/ebpf blames memlock for every EPERM; on kernels ≥ 5.11 the
	// cause is a capability or unprivileged_bpf_disabled.
	msg := strings.Replace(err.Error(), " (MEMLOCK may be too low, consider rlimit.RemoveMemlock)", "", 1)
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		return "kernel too old or feature disabled: " + msg
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		if missing := missingCaps(needs...); len(missing) > 0 {
			return "missing " + strings.Join(missing, "+") + ": " + msg
		}
		return "refused by the kernel even with the capabilities (LSM, sysctl or hook disabled): " + msg
	}
	return msg
}
