package stack

import (
	"syscall"
	"time"
)

// QuitTimeout is how long Quit waits for a graceful stop before SIGKILL:
// Debian's nginx.service has TimeoutStopSec=5 and KillMode=mixed.
const QuitTimeout = 5 * time.Second

// Quit stops nginx as `systemctl stop nginx` does: SIGQUIT, a graceful
// stop in which the workers answer the requests they have read and close
// keep-alive connections instead of reading more; then, if nginx is still
// up after QuitTimeout (Push Stream holds its subscribers' connections
// open), SIGKILL to the whole process group. Stop's SIGTERM is the fast
// stop, which may exit between answering a publish 2xx and delivering it.
func (n *Nginx) Quit() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-n.exited:
	case <-time.After(QuitTimeout):
		syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.exited
	}
	n.cmd = nil
}
