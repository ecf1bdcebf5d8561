"""stacker's acceptance cases (from stacker's test/*.bats), verbatim:
the parser tests read them, the build tests build them."""
import textwrap


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


SC01 = y("""
    busybox:
        from:
            type: oci
            url: ${{BUSYBOX_OCI}}
        run: |
            touch /foo
    """)

SC02 = y("""
    parent:
        from:
            type: oci
            url: ${{BUSYBOX_OCI}}
        run: |
            touch /root/parent
            cat /proc/self/mountinfo
    child:
        from:
            type: built
            tag: parent
        run: |
            cat /proc/self/mountinfo
            touch /root/child
    """)

SC03 = y("""
    base:
        from:
            type: oci
            url: ${{BUSYBOX_OCI}}
        cmd: foo
    layer1:
        from:
            type: built
            tag: base
        entrypoint: bar
    layer2:
        from:
            type: built
            tag: layer1
        full_command: baz
    """)

SC06 = y("""
    l1:
        from:
           type: tar
           url: .stacker/layer-bases/busybox.tar
        run: |
           mkdir -p /aaa/111/ab
           mkdir -p /ddd/111/ab
    l2:
        from:
           type: built
           tag: l1
        run: |
           rm -rf /aaa
           mkdir -p /bbb/111/ab
           mkdir -p /ccc/111/ab
           rm -rf /ddd
           mkdir -p /ddd/222/ab
    l3:
        from:
           type: built
           tag: l2
        run: |
           rm -rf /bbb
           rm -rf /ccc
           mkdir -p /aaa/222/ab
           mkdir -p /ccc/222/ab
           mkdir -p /ddd/333/ab
    l4:
        from:
          type: built
          tag: l3
        run: |
          [ ! -d /aaa/111 ]
          [ -d /aaa/222/ab ]
          [ -d /ccc/222 ]
          [ ! -d /ccc/111 ]
    """)

SC09 = y("""
    first:
      from:
        type: oci
        url: ${{BUSYBOX_OCI}}
      imports:
      - path: folder1/
        dest: /folder1/
      run: |
        [ -f /folder1/file1 ]

    second:
      from:
        type: built
        tag: first
      run: |
        mkdir -p /folder1
        touch /folder1/file1
        touch /folder1/file2

    third:
      from:
        type: oci
        url: ${{BUSYBOX_OCI}}
      imports:
        - path: stacker://second/folder1/
          dest: /folder1/
      run: |
        [ -f /folder1/file1 ]
        [ -f /folder1/file2 ]

    fourth:
      from:
        type: oci
        url: ${{BUSYBOX_OCI}}
      imports:
      - path: folder1/
        dest: /
      run: |
        ls -l /
        [ -f /file1 ]
        mkdir -p /folder4/subfolder5
        touch /folder4/subfolder5/subfile6

    fifth:
      from:
        type: oci
        url: ${{BUSYBOX_OCI}}
      imports:
      - path: folder1/subfolder2/
        dest: /folder3/
      - path: folder1/subfolder2
        dest: /folder4
      - path: stacker://fourth/folder4/subfolder5/
        dest: /folder6/
      - path: stacker://fourth/folder4/
        dest: /folder7/
      run: |
        ls -l /folder*
        [ -f /folder3/subfile1 ]
        [ ! -e /folder3/subfolder2 ]
        [ -f /folder4/subfile1 ]
        [ -f /folder6/subfile6 ]
        [ ! -e /folder6/subfolder5 ]
        [ -f /folder7/subfolder5/subfile6 ]
    """)

SC13 = y("""
    minbase1:
      from:
        type: oci
        url: $UBUNTU_OCI
      run: |
        echo pkgtool install cpio pigz

    installer-initrd:
        build_only: true
        from:
            type: built
            tag: minbase1
        run: |
            #!/bin/bash -ex
            mkdir /output
            touch /output/installer-initrd-base.cpio

    installer-initrd-modules:
        from:
            type: built
            tag: installer-build-env
        run: |
            #!/bin/bash -ex
            mkdir -p /output
            touch /output/installer-initrd-modules.cpio

    installer-build-env:
        from:
            type: built
            tag: minbase1
        build_only: true

    installer-iso-build:
        from:
            type: built
            tag: minbase1
        build_only: true
        imports:
            - stacker://installer-initrd/output/installer-initrd-base.cpio
            - stacker://installer-initrd-modules/output/installer-initrd-modules.cpio
        run: |
            #!/bin/bash -ex
            # populate the iso
            mkdir /output
            ( cd /stacker/imports && tar -cf /output/installer-iso.tar *.cpio )

    atomix-installer-iso:
        from:
            type: tar
            url: stacker://installer-iso-build/output/installer-iso.tar
    """).replace("$UBUNTU_OCI", "/srv/oci:ubuntu")  # the bats heredoc expands it

SC16 = y("""
    test:
        from:
            type: oci
            url: ${{BUSYBOX_OCI}}
        run: |
            touch /etc/reproducible.conf
            mkdir -p /var/data
            echo "build artifact" > /var/data/output.txt
    """)
