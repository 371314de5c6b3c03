// XLA FFI handler symbols exported by jax_ep._C (one per custom-call target).
// The nanobind module (module.cc) wraps them in capsules for
// jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#pragma once

#include "xla/ffi/api/api.h"

// Target "jax_ep_get_dispatch_layout" (ffi/layout_handler.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpGetDispatchLayout);

// Intranode normal mode (ffi/intranode_handler.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpCombine);

// Internode normal mode (ffi/internode_handler.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeCombine);

// Low-latency (decode) mode, split phases (ffi/low_latency_handler.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatch);  // both phases in one call
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombine);
