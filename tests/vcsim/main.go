// Command vcsim runs govmomi's vSphere API simulator (VPX model) for snapcoord's tests.
//
// It listens on 127.0.0.1 with TLS (the simulator's built-in test certificate), prints
// "URL <url>" on stdout once it serves, optionally writes the certificate as PEM, and exits
// on SIGTERM or SIGINT. Two options make snapshot tasks of one named VM misbehave:
//
//	-fail-vm NAME  CreateSnapshot_Task ends in ApplicationQuiesceFault when quiescing was
//	               requested, otherwise in InvalidPowerState
//	-hang-vm NAME  CreateSnapshot_Task stays "running" forever (task timeouts)
//
// and one takes a privilege away from the session (the simulator grants every one):
//
//	-deny-privilege ID  HasPrivilegeOnEntities answers isGranted=false for privilege ID
package main

import (
	"crypto/tls"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// faultyVM wraps one VM. simulator.VirtualMachine is embedded by value: with a pointer the
// container view no longer sees the VM's properties.
type faultyVM struct {
	simulator.VirtualMachine
	hang bool
}

func snapshotFault(quiesce bool) (types.BaseMethodFault, string) {
	if quiesce {
		msg := "An error occurred while quiescing the virtual machine: " +
			"VMware Tools is not running in the guest"
		return &types.ApplicationQuiesceFault{}, msg
	}
	msg := "The attempted operation cannot be performed in the current state (Powered on)"
	return &types.InvalidPowerState{ExistingState: types.VirtualMachinePowerStatePoweredOn}, msg
}

// CreateSnapshotTask overrides simulator.VirtualMachine.CreateSnapshotTask.
func (vm *faultyVM) CreateSnapshotTask(req *types.CreateSnapshot_Task) soap.HasFault {
	var task *simulator.Task
	if vm.hang {
		task = simulator.CreateTask(vm.Self, "createSnapshot", nil)
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.state", Val: types.TaskInfoStateRunning},
			{Name: "info.progress", Val: int32(1)},
		})
	} else {
		fault, msg := snapshotFault(req.Quiesce)
		task = simulator.CreateTask(vm.Self, "createSnapshot",
			func(*simulator.Task) (types.AnyType, types.BaseMethodFault) { return nil, fault })
		task.Run()
		simulator.Map.Update(task, []types.PropertyChange{{
			Name: "info.error",
			Val:  types.LocalizedMethodFault{Fault: fault, LocalizedMessage: msg},
		}})
	}
	return &methods.CreateSnapshot_TaskBody{
		Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Self},
	}
}

// deniedAuth wraps the AuthorizationManager (by value, as faultyVM) to refuse one privilege.
type deniedAuth struct {
	simulator.AuthorizationManager
	deny string
}

// HasPrivilegeOnEntities overrides simulator.AuthorizationManager.HasPrivilegeOnEntities.
func (m *deniedAuth) HasPrivilegeOnEntities(req *types.HasPrivilegeOnEntities) soap.HasFault {
	var result []types.EntityPrivilege
	for _, entity := range req.Entity {
		privilege := types.EntityPrivilege{Entity: entity}
		for _, id := range req.PrivId {
			privilege.PrivAvailability = append(privilege.PrivAvailability,
				types.PrivilegeAvailability{PrivId: id, IsGranted: id != m.deny})
		}
		result = append(result, privilege)
	}
	return &methods.HasPrivilegeOnEntitiesBody{
		Res: &types.HasPrivilegeOnEntitiesResponse{Returnval: result},
	}
}

// denyPrivilege replaces the model's AuthorizationManager (its reference in the VPX model's
// service content: govmomi simulator/vpx/service_content.go).
func denyPrivilege(id string) {
	ref := types.ManagedObjectReference{Type: "AuthorizationManager", Value: "AuthorizationManager"}
	auth, ok := simulator.Map.Get(ref).(*simulator.AuthorizationManager)
	if !ok {
		log.Fatal("no AuthorizationManager in the model")
	}
	simulator.Map.Put(&deniedAuth{AuthorizationManager: *auth, deny: id})
}

func wrapVM(name string, hang bool) {
	for _, entity := range simulator.Map.All("VirtualMachine") {
		if vm, ok := entity.(*simulator.VirtualMachine); ok && vm.Name == name {
			simulator.Map.Put(&faultyVM{VirtualMachine: *vm, hang: hang})
			return
		}
	}
	log.Fatalf("no virtual machine named %q", name)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	user := flag.String("user", "user", "user name")
	password := flag.String("password", "pass", "password")
	datacenters := flag.Int("datacenters", 1, "number of datacenters in the VPX model")
	failVM := flag.String("fail-vm", "", "VM whose CreateSnapshot_Task fails")
	hangVM := flag.String("hang-vm", "", "VM whose CreateSnapshot_Task never finishes")
	denied := flag.String("deny-privilege", "", "privilege HasPrivilegeOnEntities refuses")
	certOut := flag.String("cert-out", "", "write the server certificate (PEM) to this file")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter = *datacenters
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	for name, hang := range map[string]bool{*failVM: false, *hangVM: true} {
		if name != "" {
			wrapVM(name, hang)
		}
	}

	if *denied != "" {
		denyPrivilege(*denied)
	}

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	model.Service.TLS = new(tls.Config)
	server := model.Service.NewServer()
	defer server.Close()

	if *certOut != "" {
		block := &pem.Block{Type: "CERTIFICATE", Bytes: server.Certificate().Raw}
		if err := os.WriteFile(*certOut, pem.EncodeToMemory(block), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	shown := *server.URL
	shown.User = nil
	fmt.Printf("URL %s\n", shown.String())
	os.Stdout.Sync() //nolint:errcheck

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}
