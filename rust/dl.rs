//! Calling a C library that a Python extension module already loaded (the stores'
//! native writers: SQLite through the `sqlite3` module's, libpq through psycopg's),
//! so that the process never holds two copies of it.

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

/// The handle of `module_path`, a shared library this process has loaded already
/// (`RTLD_NOLOAD`: never a second copy). `dlsym` on it searches the module and
/// then the libraries it was linked with.
#[cfg(unix)]
pub(crate) fn loaded(module_path: &str) -> Result<*mut c_void, String> {
    let path = CString::new(module_path).map_err(|_| "a NUL in the module's path".to_string())?;
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(format!("{module_path} is not loaded as a shared library"));
    }
    Ok(handle)
}

#[cfg(not(unix))]
pub(crate) fn loaded(_module_path: &str) -> Result<*mut c_void, String> {
    Err("the native writers need dlopen".to_string())
}

/// The address of `name` as `handle` resolves it (null if none); `handle` None:
/// as the process's global scope resolves it.
#[cfg(unix)]
pub(crate) fn symbol(handle: Option<*mut c_void>, name: &CStr) -> *mut c_void {
    unsafe { libc::dlsym(handle.unwrap_or(libc::RTLD_DEFAULT), name.as_ptr()) }
}

#[cfg(not(unix))]
pub(crate) fn symbol(_handle: Option<*mut c_void>, _name: &CStr) -> *mut c_void {
    std::ptr::null_mut()
}

/// A function pointer from a symbol's address.
///
/// # Safety
/// `pointer` must point to a function of signature `F`.
pub(crate) unsafe fn function_pointer<F: Copy>(pointer: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&pointer) }
}

/// What `cell` holds, loaded by `load` the first time it succeeds (a failure is not
/// kept, so another module path may still succeed).
pub(crate) fn once<T>(
    cell: &'static OnceLock<T>,
    load: impl FnOnce() -> Result<T, String>,
) -> Result<&'static T, String> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let loaded = load()?;
    Ok(cell.get_or_init(|| loaded))
}
