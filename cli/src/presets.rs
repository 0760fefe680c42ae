//! `--for TARGET`: the format and options a hypervisor or cloud accepts, so users need not know
//! them.

/// Where an image is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// VMware ESXi / vSphere / OVA import: streamOptimized VMDK (lsilogic).
    Esxi,
    /// Microsoft Azure: fixed VHD, size rounded up to a whole MiB.
    Azure,
    /// Microsoft Hyper-V: dynamic VHDX.
    Hyperv,
    /// OpenStack / KVM: qcow2 v3.
    Openstack,
    /// Oracle VirtualBox: monolithicSparse VMDK.
    Virtualbox,
}

impl Target {
    /// The output format and the `-o` options the preset implies.
    pub fn format_and_options(self) -> (&'static str, &'static str) {
        match self {
            Target::Esxi => ("vmdk", "subformat=streamOptimized,adapter_type=lsilogic"),
            Target::Azure => ("vpc", "subformat=fixed,azure=on"),
            Target::Hyperv => ("vhdx", "subformat=dynamic"),
            Target::Openstack => ("qcow2", "compat=1.1"),
            Target::Virtualbox => ("vmdk", "subformat=monolithicSparse"),
        }
    }
}

/// Resolves `-O` and `--for` into one format and the preset's options (empty without a preset).
pub fn resolve(
    format: Option<&str>,
    target: Option<Target>,
) -> anyhow::Result<(String, &'static str)> {
    match (format, target) {
        (Some(f), None) => Ok((f.to_string(), "")),
        (None, Some(t)) => {
            let (f, o) = t.format_and_options();
            Ok((f.to_string(), o))
        }
        (Some(f), Some(t)) => {
            let (pf, o) = t.format_and_options();
            let same = f == pf || (f == "vhd" && pf == "vpc");
            anyhow::ensure!(same, "--for {t:?} writes {pf}, not {f}: drop -O or --for");
            Ok((pf.to_string(), o))
        }
        (None, None) => anyhow::bail!("name the output format with -O FMT or --for TARGET"),
    }
}
