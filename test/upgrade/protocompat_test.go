package upgrade_test

import (
	"fmt"
	"os"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// currentDescriptors are this tree's ferry.v1 protos.
func currentDescriptors() *descriptorpb.FileDescriptorSet {
	_ = ferrypb.File_commands_proto // linked in
	set := &descriptorpb.FileDescriptorSet{}
	protoregistry.GlobalFiles.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		if f.Package() == "ferry.v1" {
			set.File = append(set.File, protodesc.ToFileDescriptorProto(f))
		}
		return true
	})
	return set
}

// index maps every message, enum and service of a set by full name.
type index struct {
	messages map[string]*descriptorpb.DescriptorProto
	enums    map[string]*descriptorpb.EnumDescriptorProto
	services map[string]*descriptorpb.ServiceDescriptorProto
}

func indexSet(set *descriptorpb.FileDescriptorSet) index {
	ix := index{map[string]*descriptorpb.DescriptorProto{}, map[string]*descriptorpb.EnumDescriptorProto{}, map[string]*descriptorpb.ServiceDescriptorProto{}}
	var msgs func(prefix string, ms []*descriptorpb.DescriptorProto)
	enums := func(prefix string, es []*descriptorpb.EnumDescriptorProto) {
		for _, e := range es {
			ix.enums[prefix+e.GetName()] = e
		}
	}
	msgs = func(prefix string, ms []*descriptorpb.DescriptorProto) {
		for _, m := range ms {
			name := prefix + m.GetName()
			ix.messages[name] = m
			msgs(name+".", m.GetNestedType())
			enums(name+".", m.GetEnumType())
		}
	}
	for _, f := range set.GetFile() {
		p := f.GetPackage() + "."
		msgs(p, f.GetMessageType())
		enums(p, f.GetEnumType())
		for _, s := range f.GetService() {
			ix.services[p+s.GetName()] = s
		}
	}
	return ix
}

func reservedField(m *descriptorpb.DescriptorProto, num int32, name string) bool {
	for _, r := range m.GetReservedRange() {
		if num >= r.GetStart() && num < r.GetEnd() {
			return true
		}
	}
	return slices.Contains(m.GetReservedName(), name)
}

func reservedValue(e *descriptorpb.EnumDescriptorProto, num int32) bool {
	for _, r := range e.GetReservedRange() {
		if num >= r.GetStart() && num <= r.GetEnd() {
			return true
		}
	}
	return false
}

// compatible lists every way cur breaks what old servers, agents, bridges,
// Raft logs and snapshots written by old, still send or hold:
//   - a message, enum or service of old is gone;
//   - a field number of old is gone without being reserved, or now has
//     another name, type, cardinality or oneof (FSM commands are the `op`
//     oneof of Command: they may only be appended);
//   - an enum value number is gone without being reserved, or renamed;
//   - an RPC is gone or changed its request, response or streaming.
func compatible(old, cur *descriptorpb.FileDescriptorSet) []string {
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	o, c := indexSet(old), indexSet(cur)
	for name, om := range o.messages {
		cm, ok := c.messages[name]
		if !ok {
			bad("message %s removed", name)
			continue
		}
		byNum := map[int32]*descriptorpb.FieldDescriptorProto{}
		for _, f := range cm.GetField() {
			byNum[f.GetNumber()] = f
		}
		for _, of := range om.GetField() {
			cf, ok := byNum[of.GetNumber()]
			if !ok {
				if !reservedField(cm, of.GetNumber(), of.GetName()) {
					bad("%s: field %d (%s) removed without reserving its number", name, of.GetNumber(), of.GetName())
				}
				continue
			}
			if cf.GetName() != of.GetName() {
				bad("%s: field %d renamed %s -> %s", name, of.GetNumber(), of.GetName(), cf.GetName())
			}
			if cf.GetType() != of.GetType() || cf.GetTypeName() != of.GetTypeName() {
				bad("%s: field %d (%s) retyped %v %s -> %v %s", name, of.GetNumber(), of.GetName(), of.GetType(), of.GetTypeName(), cf.GetType(), cf.GetTypeName())
			}
			if cf.GetLabel() != of.GetLabel() {
				bad("%s: field %d (%s) cardinality %v -> %v", name, of.GetNumber(), of.GetName(), of.GetLabel(), cf.GetLabel())
			}
			if of.OneofIndex != nil || cf.OneofIndex != nil {
				oo, co := "", ""
				if of.OneofIndex != nil {
					oo = om.GetOneofDecl()[of.GetOneofIndex()].GetName()
				}
				if cf.OneofIndex != nil {
					co = cm.GetOneofDecl()[cf.GetOneofIndex()].GetName()
				}
				if oo != co {
					bad("%s: field %d (%s) moved from oneof %q to %q", name, of.GetNumber(), of.GetName(), oo, co)
				}
			}
		}
	}
	for name, oe := range o.enums {
		ce, ok := c.enums[name]
		if !ok {
			bad("enum %s removed", name)
			continue
		}
		byNum := map[int32]string{}
		for _, v := range ce.GetValue() {
			byNum[v.GetNumber()] = v.GetName()
		}
		for _, ov := range oe.GetValue() {
			cv, ok := byNum[ov.GetNumber()]
			switch {
			case !ok && !reservedValue(ce, ov.GetNumber()):
				bad("%s: value %d (%s) removed without reserving it", name, ov.GetNumber(), ov.GetName())
			case ok && cv != ov.GetName():
				bad("%s: value %d reused: %s -> %s", name, ov.GetNumber(), ov.GetName(), cv)
			}
		}
	}
	for name, os := range o.services {
		cs, ok := c.services[name]
		if !ok {
			bad("service %s removed", name)
			continue
		}
		methods := map[string]*descriptorpb.MethodDescriptorProto{}
		for _, m := range cs.GetMethod() {
			methods[m.GetName()] = m
		}
		for _, om := range os.GetMethod() {
			cm, ok := methods[om.GetName()]
			if !ok {
				bad("%s: rpc %s removed", name, om.GetName())
				continue
			}
			if cm.GetInputType() != om.GetInputType() || cm.GetOutputType() != om.GetOutputType() ||
				cm.GetClientStreaming() != om.GetClientStreaming() || cm.GetServerStreaming() != om.GetServerStreaming() {
				bad("%s: rpc %s changed shape", name, om.GetName())
			}
		}
	}
	slices.Sort(problems)
	return problems
}

// TestProtoCompatibleWithPreviousRelease compares the previous release's
// ferry.v1 descriptors with this tree's.
func TestProtoCompatibleWithPreviousRelease(t *testing.T) {
	r := previousRelease(t)
	data, err := os.ReadFile(r.descriptors)
	if err != nil {
		t.Fatal(err)
	}
	old := &descriptorpb.FileDescriptorSet{}
	if err := proto.Unmarshal(data, old); err != nil {
		t.Fatal(err)
	}
	ix := indexSet(old)
	if _, ok := ix.messages["ferry.v1.Command"]; !ok || len(ix.services) == 0 {
		t.Fatalf("the previous release's descriptors hold no Command or no service (%d files)", len(old.GetFile()))
	}
	for _, p := range compatible(old, currentDescriptors()) {
		t.Error(p)
	}
}

// TestCompatibilityRulesCatchBreaks proves the comparison fails on each
// kind of break, on a copy of this tree's own descriptors.
func TestCompatibilityRulesCatchBreaks(t *testing.T) {
	cur := currentDescriptors()
	if got := compatible(cur, cur); len(got) != 0 {
		t.Fatalf("a set is not compatible with itself: %v", got)
	}
	find := func(set *descriptorpb.FileDescriptorSet, msg string) *descriptorpb.DescriptorProto {
		return indexSet(set).messages[msg]
	}
	opField := func(m *descriptorpb.DescriptorProto, name string) *descriptorpb.FieldDescriptorProto {
		for _, f := range m.GetField() {
			if f.GetName() == name {
				return f
			}
		}
		t.Fatalf("%s has no field %s", m.GetName(), name)
		return nil
	}
	for _, tc := range []struct {
		name   string
		break_ func(*descriptorpb.FileDescriptorSet)
	}{
		{"command renumbered", func(s *descriptorpb.FileDescriptorSet) {
			opField(find(s, "ferry.v1.Command"), "entries_create").Number = proto.Int32(99)
		}},
		{"command number reused", func(s *descriptorpb.FileDescriptorSet) {
			m := find(s, "ferry.v1.Command")
			opField(m, "entries_create").Name = proto.String("something_else")
		}},
		{"field retyped", func(s *descriptorpb.FileDescriptorSet) {
			opField(find(s, "ferry.v1.Entry"), "spiffe_id").Type = descriptorpb.FieldDescriptorProto_TYPE_BYTES.Enum()
		}},
		{"field made repeated", func(s *descriptorpb.FileDescriptorSet) {
			opField(find(s, "ferry.v1.Entry"), "spiffe_id").Label = descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
		}},
		{"field removed", func(s *descriptorpb.FileDescriptorSet) {
			m := find(s, "ferry.v1.Entry")
			m.Field = slices.DeleteFunc(m.Field, func(f *descriptorpb.FieldDescriptorProto) bool { return f.GetName() == "hint" })
		}},
		{"enum value reused", func(s *descriptorpb.FileDescriptorSet) {
			for _, e := range indexSet(s).enums {
				if len(e.GetValue()) > 1 {
					e.Value[1].Name = proto.String("REUSED")
					return
				}
			}
			t.Fatal("no enum with two values")
		}},
		{"rpc removed", func(s *descriptorpb.FileDescriptorSet) {
			for _, svc := range indexSet(s).services {
				svc.Method = svc.Method[1:]
				return
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			broken := proto.Clone(cur).(*descriptorpb.FileDescriptorSet)
			tc.break_(broken)
			if got := compatible(cur, broken); len(got) == 0 {
				t.Errorf("%s not caught", tc.name)
			} else {
				t.Log(got)
			}
		})
	}
	// Removing a field whose number is reserved is allowed.
	ok := proto.Clone(cur).(*descriptorpb.FileDescriptorSet)
	m := find(ok, "ferry.v1.Entry")
	hint := opField(m, "hint")
	m.Field = slices.DeleteFunc(m.Field, func(f *descriptorpb.FieldDescriptorProto) bool { return f.GetName() == "hint" })
	m.ReservedRange = append(m.ReservedRange, &descriptorpb.DescriptorProto_ReservedRange{Start: proto.Int32(hint.GetNumber()), End: proto.Int32(hint.GetNumber() + 1)})
	if got := compatible(cur, ok); len(got) != 0 {
		t.Errorf("a reserved removal is flagged: %v", got)
	}
}
