// Command etcd is etcd's own server, built from the module graph that the pinned
// k8s.io/kubernetes release resolves, so the test control plane needs no download.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
