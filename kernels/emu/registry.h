// Kernels by name, for launching them in the emulator with CUDA's calling convention: the
// arguments arrive as an array of pointers, one to each argument's value (as cuLaunchKernel's
// kernelParams), and are unpacked into the kernel's parameter types. Kernels register themselves
// with PK_EXPORT (kernels/ew.cuh); kernels/emu/ops_emu.cpp launches them (pk_emu_launch).
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

namespace pk_emu {

// A kernel bound to its arguments: runs one thread's body.
using Body = std::function<void()>;
using Binder = std::function<Body(void**)>;

inline std::map<std::string, Binder>& table() {
    static std::map<std::string, Binder> t;
    return t;
}

template <class... A, std::size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::decay_t<A>*>(args[I])...);
}

template <class... A>
bool add(const char* name, void (*f)(A...)) {
    table()[name] = [f](void** args) -> Body { return [f, args] { call(f, args, std::index_sequence_for<A...>{}); }; };
    return true;
}

}  // namespace pk_emu
