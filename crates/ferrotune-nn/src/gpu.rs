//! GPU memory accounting and allocator settings, read from the CUDA driver's default memory
//! pool (candle allocates through `cuMemAllocAsync`, i.e. from that pool).
//!
//! Owns: the pool's peak-usage counter and its release threshold. Does not own: allocation.
//! Without the `cuda` feature, or on a CPU device, every function is a no-op returning `None`.

use candle_core::Device;

/// Peak bytes in use in the device's memory pool since the last [`reset_peak`] (the
/// allocator's own count, like `torch.cuda.max_memory_allocated`).
pub fn peak_bytes(device: &Device) -> Option<u64> {
    imp::pool_attr(device, imp::USED_HIGH)
}

/// Bytes currently in use in the device's memory pool.
pub fn used_bytes(device: &Device) -> Option<u64> {
    imp::pool_attr(device, imp::USED_CURRENT)
}

/// Resets the peak counter to the current use.
pub fn reset_peak(device: &Device) {
    imp::set_pool_attr(device, imp::USED_HIGH, 0);
}

/// Lets the pool keep freed memory instead of returning it to the driver at every
/// synchronisation, so steady-state steps allocate without driver calls (what PyTorch's caching
/// allocator does).
pub fn keep_freed_memory(device: &Device) {
    imp::set_pool_attr(device, imp::RELEASE_THRESHOLD, u64::MAX);
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    pub(super) const USED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pub(super) const USED_CURRENT: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
    pub(super) const RELEASE_THRESHOLD: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else { return None };
        let cu_dev = d.cuda_stream().context().cu_device();
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver query with a valid device handle and an out pointer.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    pub(super) fn pool_attr(device: &Device, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let pool = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: these attributes are 64-bit values (cuuint64_t).
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub(super) fn set_pool_attr(device: &Device, attr: sys::CUmemPool_attribute, mut v: u64) {
        if let Some(pool) = pool(device) {
            // SAFETY: as above; a failure leaves the pool as it was, which is harmless.
            let _ = unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut _) };
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub(super) const USED_HIGH: u8 = 0;
    pub(super) const USED_CURRENT: u8 = 1;
    pub(super) const RELEASE_THRESHOLD: u8 = 2;

    pub(super) fn pool_attr(_: &Device, _: u8) -> Option<u64> {
        None
    }

    pub(super) fn set_pool_attr(_: &Device, _: u8, _: u64) {}
}
